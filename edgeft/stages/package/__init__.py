"""package: build an ONNX Runtime GenAI model of the merged model into `WS/bundle/`, verified and described.

The GenAI builder runs through its public command line (`python -m onnxruntime_genai.models.builder`);
int4 settings (block size, accuracy level, symmetry) come from the device profile. The bundle's
`manifest.json` holds the sha256 of every file, the source model and adapter hashes, the profile,
precision, library versions and the verification figures: greedy tokens on a few prompts against
transformers on the merged model (fp32 must match token for token; int4 reports agreement and the
largest logit error).

stage.py runs it; builder.py drives the GenAI builder; verify.py checks the bundle against transformers and
the training runtime; readme.py writes what an app developer reads."""
