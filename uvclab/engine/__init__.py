"""The engine: config, data, distillation, the one training loop, the compress pipeline, teachers."""
