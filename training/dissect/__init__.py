"""Network Dissection and the consistency metrics of design.md §5: label every unit with a concept, streaming."""
