"""The data path: corpora -> indexed datasets (indexed.py) -> tokenizers, preprocessing, and the
GPT/BERT sample datasets with blending and exact-resume sampling. See DESIGN.md section 1."""
