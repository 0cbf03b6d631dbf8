"""Serving: the OpenAI-compatible server (app/server.py) and the Gradio demo (app/demo.py), both on tiny_hf.engine."""
