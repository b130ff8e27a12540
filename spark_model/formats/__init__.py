"""Reading models made elsewhere: GGUF files and Hugging Face directories.

Each reader turns its source into Hugging Face-named, Hugging Face-oriented NumPy arrays
(`model.layers.{i}.self_attn.q_proj.weight`, (out, in)); `mapping.spark_params` turns
those into the Spark parameter names and layouts (docs/checkpoint-format.md).
"""
