"""Answering from a run: the chatbot (`generate.py`), the engines that compute logits (`fastgen.py`: torch;
`llamacpp.py`: llama.cpp on a GGUF export, `gguf_export.py`), the token picker they share (`sampling.py`) and the
decoding rules (`constrain.py`)."""
