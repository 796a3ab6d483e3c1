"""Training: the config and its validator (args.py), the runtime every program builds (runtime.py),
the parallel model (pipeline chunks + data parallel), pure losses (losses.py), the step that owns
normalization, loss scaling and logging (step.py), checkpoints, and the Trainer loop on top. The
command line is megapre/cli/pretrain.py."""
