"""Reports for people: the HTML review page's template and its assets (package data)."""
