"""Measuring the models: the rater (the gold standard), the evaluate stage's measurements and studies, the
attention studies, and the report."""
