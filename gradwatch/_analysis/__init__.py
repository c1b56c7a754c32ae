"""Analysis: from a raw capture to quantities, verdicts and a diagnosed report."""
