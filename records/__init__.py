"""Reference runs, the public records' curves and the run report (report.py)."""
