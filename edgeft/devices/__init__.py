"""Target devices: the profile schema and its loader, `devices probe` (measure this machine), and the planner
(peak memory and step time of a run on a profile, before anything heavy runs). Imports `core`, `models` and
`runtime`."""
