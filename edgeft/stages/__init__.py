"""The pipeline's stages, each a typed function over a workspace: prepare -> export -> train -> merge ->
package, then evaluate and bench (and chat with a bundle). Each reads what the stage before it recorded and
calls the packages below; none calls another through the CLI."""
