"""Performance measurement: `maxlm bench` (step time, MFU, memory) and `maxlm compile` (ahead-of-time memory fit)."""
