"""Tokenizer backends; import the public API from `megapre.data.tokenizers`."""
