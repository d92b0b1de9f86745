"""The Faust agents: thin loops that call the pure operators of :mod:`pipeline.domain`,
write the tables and send."""
