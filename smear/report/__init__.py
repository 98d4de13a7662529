"""Reports of a run: the differential summary, CSV and JSON tables, the HTML review page (templates/)."""
