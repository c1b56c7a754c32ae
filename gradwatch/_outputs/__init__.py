"""What gradwatch does with its verdicts: TensorBoard panels, log warnings, clipping."""
