"""Benchmark tooling (timing, memory, multiply-adds); outside the runtime
package, imported by nothing in `nvae_tf`."""
