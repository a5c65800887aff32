"""Pure logic: no Twisted I/O, no clock reads, no file or network access."""
