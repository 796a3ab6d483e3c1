"""Doors in and out of megapre checkpoints: `megapre-convert hf-import | hf-export` (Hugging Face
transformers directories: GPT-2 and Llama families).

A megapre checkpoint is layout-independent, so a converted model is written once, by one process,
and then loads under any tensor/pipeline/data-parallel layout (`--load`). Conversion never
needs `transformers` to read a Hugging Face directory (config.json and safetensors are read
directly); writing one uses transformers' config classes so the result loads with
`AutoModelForCausalLM.from_pretrained` of the installed version (`pip install megapre[interop]`).

`megapre-convert onnx` is a door out only: the model traced into one ONNX file for ONNX Runtime
(megapre/convert/onnx.py; `pip install megapre[onnx]`).
"""
