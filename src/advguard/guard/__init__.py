"""advguard's runtime guard."""
