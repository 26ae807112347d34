"""The checkpoint half: sparse checkpoint formats, save/load/inspect, the model card and the Hub."""
