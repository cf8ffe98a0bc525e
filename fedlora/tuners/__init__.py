"""PEFT tuners provided by fedlora."""
