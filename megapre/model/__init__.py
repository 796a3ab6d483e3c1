"""Transformer models (GPT causal LM, BERT masked LM) built on megapre.parallel's tensor-parallel
layers and megapre.ops kernels. Tensors inside the model are [sequence, batch, hidden]."""
