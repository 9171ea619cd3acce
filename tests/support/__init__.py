"""What the tests share: doubles, harnesses and the messages clients send.

No test module imports another; whatever two of them need lives here.
"""
