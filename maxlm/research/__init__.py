"""Research velocity: sweeps and their results, and comparing runs.

hyper    building a sweep's runs: grids, zips, seeded random search
sweep    `maxlm sweep`: run a sweep file's runs resumably, in parallel, with optional successive halving
results  results.csv / results.md of a sweep
compare  `maxlm compare`: runs side by side (the config keys that differ) and loss curves
"""
