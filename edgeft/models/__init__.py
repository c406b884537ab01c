"""Hugging Face model folders: which families edgeft supports, what their files say (config, safetensors
headers, weight shapes), and the base model with its weights loaded lazily, one tensor or one decoder layer
at a time. Imports only `core`."""
