"""HTML reports from the results store."""
