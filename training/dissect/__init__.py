"""Network Dissection and the consistency metrics of docs/design.md §5: label every unit with a concept, streaming."""
