"""The quantized frozen base: int8 and int4 values as the GenAI builder quantizes them (training sees the bytes
the bundle ships), the quantized copy of a merged model that package builds from, and the torch backend's
quantized Linear. Imports `core` and `models`."""
