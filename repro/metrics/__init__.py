"""Numbers we report: parameter and MAC counts, throughput (and, as they land, FID / IS)."""
