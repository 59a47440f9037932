"""What every op shares: the dispatch and the backends' op records, argument validation, the logit
transforms, the gradient-in-forward autograd contract, the fakes, and the ids shared with the
kernels."""
