"""Training data: reading and checking JSONL (chat, prompt/completion, text), tokenizing with the model's
own chat template and loss mask, and writing plain numpy arrays the training runtime reads."""
