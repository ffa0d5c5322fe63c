"""Command-line tools: tiny test models and tokenizer, default model preparation."""
