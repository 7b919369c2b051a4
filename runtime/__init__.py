"""Python side of the inference engine. Imports without torch."""
