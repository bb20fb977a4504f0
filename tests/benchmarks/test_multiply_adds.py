"""Multiply-adds counted in traced graphs, against the arithmetic by hand."""

import pytest
import tensorflow as tf

from benchmarks import multiply_adds


def _count(fn, *specs):
    return multiply_adds.count(fn.get_concrete_function(*specs).graph)


def test_convolution_and_both_gradients():
    # [2, 8, 8, 3] -> [2, 8, 8, 5], 3x3 taps over 3 input channels.
    forward = 2 * 8 * 8 * 5 * 3 * 3 * 3

    @tf.function
    def loss_and_grads(x, kernel):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME") ** 2)
        return tape.gradient(loss, [x, kernel])

    counted = _count(loss_and_grads, tf.TensorSpec([2, 8, 8, 3]),
                     tf.TensorSpec([3, 3, 3, 5]))
    assert counted == {"convolution 3x3": forward,
                       "convolution gradient 3x3": 2 * forward}


def test_strided_convolution_counts_its_output_elements():
    fn = tf.function(lambda x, k: tf.nn.conv2d(x, k, 2, "SAME"))
    assert _count(fn, tf.TensorSpec([2, 8, 8, 3]),
                  tf.TensorSpec([3, 3, 3, 5])) == {
                      "convolution 3x3": 2 * 4 * 4 * 5 * 3 * 3 * 3}


def test_depthwise_counts_taps_per_output_element():
    # [2, 8, 8, 4] with channel multiplier 2 -> 8 output channels, 5x5 taps.
    fn = tf.function(lambda x, k: tf.nn.depthwise_conv2d(
        x, k, (1, 1, 1, 1), "SAME"))
    assert _count(fn, tf.TensorSpec([2, 8, 8, 4]),
                  tf.TensorSpec([5, 5, 4, 2])) == {
                      "depthwise 5x5": 2 * 8 * 8 * 8 * 5 * 5}


def test_matmul_transposed_and_batched():
    fn = tf.function(lambda a, b, c, d: (
        tf.matmul(a, b, transpose_a=True), tf.matmul(c, d)))
    counted = _count(fn, tf.TensorSpec([4, 3]), tf.TensorSpec([4, 6]),
                     tf.TensorSpec([2, 3, 4]), tf.TensorSpec([2, 4, 6]))
    assert counted == {"matmul": 3 * 6 * 4 + 2 * 3 * 6 * 4}


def test_called_functions_are_counted_at_each_call():
    inner = tf.function(lambda a, b: tf.matmul(a, b))
    middle = tf.function(lambda a, b: inner(a, b) + inner(a, b))
    outer = tf.function(lambda a, b: middle(a, b) + tf.matmul(a, b))
    assert _count(outer, tf.TensorSpec([3, 4]),
                  tf.TensorSpec([4, 5])) == {"matmul": 3 * 3 * 5 * 4}


def test_loop_bodies_and_both_branches_are_counted_once():
    def fn(a, flag):
        _, a = tf.while_loop(lambda i, a: i < 3,
                             lambda i, a: (i + 1, tf.matmul(a, a)),
                             (tf.constant(0), a))
        return tf.cond(flag, lambda: tf.matmul(a, a),
                       lambda: tf.matmul(a, a, transpose_a=True))

    assert _count(tf.function(fn), tf.TensorSpec([4, 4]),
                  tf.TensorSpec([], tf.bool)) == {"matmul": 3 * 4 ** 3}


def test_unknown_shapes_are_refused():
    fn = tf.function(lambda a, b: tf.matmul(a, b))
    with pytest.raises(ValueError, match="fully defined"):
        _count(fn, tf.TensorSpec([None, 4]), tf.TensorSpec([4, 5]))


def test_element_wise_ops_are_not_counted():
    fn = tf.function(lambda x: tf.nn.silu(x) * 2.0 + tf.reduce_mean(x))
    assert _count(fn, tf.TensorSpec([4, 8])) == {}


def test_peak_rate_of_this_machine():
    rate = multiply_adds.peak_rate(parallel=1, size=128, calls=3)
    assert 1e8 < rate < 1e13  # multiply-adds per second of one CPU core


def test_agrees_with_tensorflow_profiler():
    """TensorFlow's float-op statistics count 2 flops per multiply-add."""
    @tf.function
    def convolutions(x, kernel, depthwise_kernel):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
        grads = tape.gradient(y, [x, kernel], output_gradients=tf.ones_like(y))
        return grads, tf.nn.depthwise_conv2d(x, depthwise_kernel,
                                             (1, 1, 1, 1), "SAME")

    concrete = convolutions.get_concrete_function(
        tf.TensorSpec([2, 8, 8, 3]), tf.TensorSpec([3, 3, 3, 5]),
        tf.TensorSpec([5, 5, 3, 2]))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(concrete.graph, options=options)
    assert profile.total_float_ops == \
        2 * multiply_adds.function_multiply_adds(concrete)
