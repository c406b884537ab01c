"""edgeft serve: the OpenAI fine-tuning and chat API on a workstation or an edge box.

    store.py   the state in SQLite: files, jobs, events, checkpoints (survives restarts)
    api.py     the routes, as the openai client calls them (FastAPI on uvicorn)
    worker.py  one fine-tuning job at a time: the edgeft pipeline in a child process, resumed after a restart
    models.py  base models and fine-tuned adapters on onnxruntime-genai, one og.Model per base
    serve.py   the command: options, API key, start and stop
"""
