"""Training: flags, the experiment config's trainer/runtime sections, the
step, the loop, its log, the optimiser and the model directory's
checkpoints."""
