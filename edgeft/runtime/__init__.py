"""The two ONNX Runtime builds: installing the training build into a side directory, running edgeft code in
it as a subprocess that streams events back (the launcher), and `edgeft doctor`. Imports only `core`; the code
that runs inside the subprocess is `trainer`."""
