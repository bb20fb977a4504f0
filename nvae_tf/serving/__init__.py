"""Everything downstream of a model directory: inference, evaluation,
SavedModel export, BatchNorm re-estimation and image grids."""
