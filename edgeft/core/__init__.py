"""What every other package stands on, and nothing of the models or runtimes: user errors, atomic writes,
typed configs, state files, content hashes, the workspace (its manifest, its lock), progress, plots and
memory readings. Imports nothing else of edgeft."""
