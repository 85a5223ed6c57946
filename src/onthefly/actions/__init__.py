"""What a person does with the evidence: slices, clusterings, exports (one module each); later
forks, merges, gates, comparisons and health check-ups."""
