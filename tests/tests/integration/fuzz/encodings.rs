//! The request bodies of the storm: (a) random bytes, (b) realistic requests with random
//! mutations, and (c) hand-built nasty protobuf encodings, with the wire-format helpers that
//! build them.

use bytes::Bytes;
use rand::{Rng, rngs::StdRng};

use super::{QUEUE, methods::Method};

/// Longest random body.
const MAX_BODY: usize = 4 * 1024;

/// One request body for one method.
pub(super) struct Body {
    pub(super) method: usize,
    pub(super) bytes: Bytes,
}

/// Class (a): random bytes of random length, short lengths as likely as long ones. Random bytes
/// that happen to decode (the empty body, short runs) are valid requests, not garbage; they are
/// left out so the class can promise that nothing reaches Redis.
pub(super) fn garbage_bodies(rng: &mut StdRng, methods: &[Method], count: usize) -> Vec<Body> {
    let mut bodies = Vec::with_capacity(count);
    while bodies.len() < count {
        let method = rng.random_range(0..methods.len());
        let len = if rng.random_bool(0.5) {
            rng.random_range(0..64)
        } else {
            rng.random_range(0..=MAX_BODY)
        };
        let mut bytes = vec![0; len];
        rng.fill(bytes.as_mut_slice());
        if !(methods[method].decodes)(&bytes) {
            bodies.push(Body {
                method,
                bytes: bytes.into(),
            });
        }
    }
    bodies
}

/// Class (b): realistic requests with one to three random mutations each.
pub(super) fn mutated_bodies(rng: &mut StdRng, methods: &[Method], count: usize) -> Vec<Body> {
    (0..count)
        .map(|_| {
            let method = rng.random_range(0..methods.len());
            let samples = &methods[method].samples;
            let sample = &samples[rng.random_range(0..samples.len())];
            let donor = &methods[rng.random_range(0..methods.len())].samples[0];
            Body {
                method,
                bytes: mutate(rng, sample, donor).into(),
            }
        })
        .collect()
}

fn mutate(rng: &mut StdRng, sample: &[u8], donor: &[u8]) -> Vec<u8> {
    let mut body = sample.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        let len = body.len();
        let at = rng.random_range(0..=len);
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let bit = rng.random_range(0..len * 8);
                body[bit / 8] ^= 1 << (bit % 8);
            }
            1 => body.truncate(at),
            2 => {
                let inserted: Vec<u8> =
                    (0..rng.random_range(1..=8)).map(|_| rng.random()).collect();
                body.splice(at..at, inserted);
            }
            3 => {
                let end = rng.random_range(at..=len);
                body.drain(at..end);
            }
            4 => {
                // A copy of a stretch of the body elsewhere: fields and fragments repeated.
                let end = rng.random_range(at..=len);
                let copy = body[at..end].to_vec();
                let to = rng.random_range(0..=len);
                body.splice(to..to, copy);
            }
            5 => {
                // Every field twice: scalars take the last value, messages merge, lists grow.
                body.extend_from_slice(sample);
            }
            6 if len > 0 => {
                let interesting = [0x00, 0x01, 0x7f, 0x80, 0xff];
                body[at.min(len - 1)] = interesting[rng.random_range(0..interesting.len())];
            }
            _ => {
                // Another method's fields appended: known numbers with the wrong meaning.
                let end = rng.random_range(0..=donor.len());
                body.extend_from_slice(&donor[..end]);
            }
        }
    }
    body
}

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(field: u64, wire_type: u8) -> Vec<u8> {
    let mut out = Vec::new();
    varint((field << 3) | u64::from(wire_type), &mut out);
    out
}

pub(super) fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A length-delimited field holding `inner`.
fn len_field(field: u64, inner: &[u8]) -> Vec<u8> {
    let mut out = key(field, LEN);
    varint(inner.len() as u64, &mut out);
    out.extend_from_slice(inner);
    out
}

/// Class (c): hand-built encodings that stress the decoder, each sent to every method (where its
/// field numbers mean different things), and once more after a valid request of one method (so
/// valid fields are followed by junk).
pub(super) fn nasty_bodies(methods: &[Method]) -> Vec<Body> {
    let mut bodies = Vec::new();
    for (index, shape) in nasty_shapes().into_iter().enumerate() {
        let after = index % methods.len();
        bodies.push(Body {
            method: after,
            bytes: concat(&[&methods[after].samples[0], &shape]).into(),
        });
        let shape = Bytes::from(shape);
        for method in 0..methods.len() {
            bodies.push(Body {
                method,
                bytes: shape.clone(),
            });
        }
    }
    bodies
}

fn nasty_shapes() -> Vec<Vec<u8>> {
    // u64::MAX (-1 as int32 or int64): the longest legal varint.
    let max_varint = concat(&[&[0xff; 9], &[0x01]]);
    let eleven_byte_varint = concat(&[&[0x80; 10], &[0x00]]);
    // Ten bytes whose last one carries more than the 64th bit.
    let overflowing_varint = concat(&[&[0xff; 9], &[0x7f]]);
    // 3, spelled in ten bytes: legal, but no encoder writes it.
    let padded_three = concat(&[&[0x83], &[0x80; 8], &[0x00]]);
    let mut shapes: Vec<Vec<u8>> = vec![Vec::new()];
    // Every field number a request message uses, with every wire type and broken payloads: wrong
    // wire types for the field's real type, lengths beyond the body, truncated values.
    for field in 1..=6 {
        let k = |wire_type| key(field, wire_type);
        let mut huge_len = k(LEN);
        varint(u64::MAX, &mut huge_len);
        let mut two_gib_len = k(LEN);
        varint(1 << 31, &mut two_gib_len);
        shapes.extend([
            concat(&[&k(VARINT), &max_varint]),
            concat(&[&k(VARINT), &eleven_byte_varint]),
            concat(&[&k(VARINT), &overflowing_varint]),
            concat(&[&k(VARINT), &[0x80]]),
            concat(&[&k(FIXED64), &[1, 2, 3, 4, 5, 6, 7, 8]]),
            concat(&[&k(FIXED64), &[1, 2, 3]]),
            concat(&[&k(FIXED32), &[0xff, 0xff, 0xff, 0x7f]]),
            concat(&[&k(FIXED32), &[1]]),
            concat(&[&huge_len, b"abc"]),
            concat(&[&two_gib_len, b"abc"]),
            concat(&[&k(LEN), &[4], b"abc"]),
            concat(&[&k(LEN), &[0]]),
            concat(&[&k(LEN), &padded_three, b"abc"]),
            k(START_GROUP),
            concat(&[&k(START_GROUP), &k(END_GROUP)]),
            concat(&[&k(START_GROUP), &key(field + 1, END_GROUP)]),
            k(END_GROUP),
            concat(&[&k(6), &[1]]),
            concat(&[&k(7), &[1]]),
            // The key itself in ten bytes.
            concat(&[&[0x80 | ((field as u8) << 3)], &[0x80; 8], &[0x00, 0x01]]),
            // Nested, with an inner length that overruns the outer one.
            len_field(field, &concat(&[&k(LEN), &[100], &len_field(field, b"x")])),
            // Nested through the field again and again: a message field holds a message whose
            // same-numbered field is a string, bytes or a scalar that receives the nesting.
            (0..50).fold(b"leaf".to_vec(), |inner, _| len_field(field, &inner)),
            // Thousands of entries: an empty message or string per entry.
            [k(LEN), vec![0]].concat().repeat(2_000),
            // A packed run of ten-byte negative numbers, a large one and a small one.
            len_field(
                field,
                &concat(&[
                    &max_varint.repeat(10),
                    &[0xff, 0xff, 0xff, 0xff, 0x07],
                    &[6],
                ]),
            ),
            // A packed run whose last number is cut off.
            len_field(field, &[0x01, 0x02, 0x80]),
        ]);
    }
    let mut max_field = Vec::new();
    varint((((1 << 29) - 1) << 3) | u64::from(VARINT), &mut max_field);
    let mut beyond_max_field = Vec::new();
    varint(((1 << 29) << 3) | u64::from(VARINT), &mut beyond_max_field);
    let groups = |depth: usize| {
        concat(&[
            &key(99, START_GROUP).repeat(depth),
            &key(99, END_GROUP).repeat(depth),
        ])
    };
    shapes.extend([
        // Field number 0, the largest legal one, and one beyond.
        vec![0x00, 0x01],
        concat(&[&max_field, &[1]]),
        concat(&[&beyond_max_field, &[1]]),
        // Unknown groups nested just inside and beyond prost's recursion limit of 100.
        groups(100),
        groups(101),
        groups(1_000),
        // The queue named twice: a valid name, then a hostile one (the last one counts).
        concat(&[&len_field(1, QUEUE.as_bytes()), &len_field(1, b"a{b}\r\n")]),
        concat(&[&len_field(1, b"a{b}\r\n"), &len_field(1, QUEUE.as_bytes())]),
        // Invalid UTF-8 in a string field, a queue name far over the limit, control characters.
        len_field(1, &[0xc3, 0x28]),
        len_field(1, &[0xed, 0xa0, 0x80]),
        len_field(1, &b"q".repeat(4_000)),
        len_field(1, b"\0\x01\x7f"),
        // A map entry (EnqueueItem.headers inside EnqueueRequest.items) without key, without
        // value, with its fields swapped, and twice with the same key.
        len_field(2, &len_field(7, &[])),
        len_field(2, &len_field(7, &len_field(2, b"v"))),
        len_field(
            2,
            &len_field(7, &concat(&[&len_field(2, b"v"), &len_field(1, b"k")])),
        ),
        len_field(
            2,
            &concat(&[
                &len_field(7, &len_field(1, b"k")),
                &len_field(7, &len_field(1, b"k")),
            ]),
        ),
        // Durations and timestamps at extremes: EnqueueItem.delay and .not_before, and the
        // durations of LeaseRequest, ExtendLeaseRequest and FailRequest.
        len_field(
            2,
            &len_field(
                4,
                &concat(&[&key(1, VARINT), &max_varint, &key(2, VARINT), &max_varint]),
            ),
        ),
        len_field(
            2,
            &len_field(
                5,
                &concat(&[
                    &key(1, VARINT),
                    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                ]),
            ),
        ),
        len_field(3, &concat(&[&key(1, VARINT), &max_varint])),
        len_field(
            4,
            &concat(&[&key(2, VARINT), &[0xff, 0xff, 0xff, 0xff, 0x07]]),
        ),
    ]);
    shapes
}
