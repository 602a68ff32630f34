"""The language-model side: models behind one interface (our Transformer, its output
heads, HF causal LMs), blocked forward passes (:mod:`.scoring`), checkpoints, training,
optimisers, devices and distributed set-up."""
