"""The explorer: what the kNN-LM retrieves, in the browser (``knnlm neighbors --html``)."""
