"""A file object that counts the bytes written through it, for tests that make a write fail or
stall part-way (tests/engine/test_faults.py, in-process and in the subprocess it starts)."""


class WrappedFile:
    """Forwards everything to the real file `f`; subclasses add the fault to write() or flush()."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        n = self.f.write(data)
        self.written += n
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
