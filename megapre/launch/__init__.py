"""Planning and launching runs rather than running one: the memory/FLOPs estimate of a config
before launch, and the runs of a hyperparameter sweep."""
