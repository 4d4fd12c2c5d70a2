//! The entry point of the fuzz target (`fuzz/`), also run over random and mutated inputs by the
//! test suite: arbitrary bytes go through everything a server does with untrusted input — frame
//! splitting under both limits, hello and request decoding, item validation, storing, sampling.

use crate::protocol::{
    codec, decode, decode_hello, Request, FRAME_LIMIT, HELLO_FRAME_LIMIT, MAX_SAMPLE,
};
use crate::store::{Policy, Store, StoreConfig};
use bytes::BytesMut;
use rand::SeedableRng;
use tokio_util::codec::Decoder;

pub fn feed(bytes: &[u8]) {
    for limit in [HELLO_FRAME_LIMIT, FRAME_LIMIT] {
        let mut codec = codec(limit);
        let mut buffer = BytesMut::from(bytes);
        // The codec reserves at most the frame limit, whatever the length prefix says.
        while let Ok(Some(frame)) = codec.decode(&mut buffer) {
            assert!(frame.len() <= limit);
            handle(&frame);
        }
    }
    handle(bytes);
}

fn handle(frame: &[u8]) {
    let _ = decode_hello(frame);
    let Ok(request) = decode::<Request>(frame) else {
        return;
    };
    let config = StoreConfig {
        capacity: 8,
        policy: Policy::Prioritized,
        diversity: gfn_diversity::Diversity::default(),
        // Items of log-reward 0.0 or more are modes, one per key.
        modes: Some(std::sync::Arc::new(|item: &crate::protocol::Item| {
            if item.log_reward >= 0.0 {
                vec![item.key]
            } else {
                Vec::new()
            }
        })),
    };
    let mut store = Store::new(config.clone());
    // The diverse policy judges a pushed batch as a whole.
    let mut diverse = Store::new(StoreConfig {
        policy: Policy::Diverse,
        ..config
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    match request {
        Request::Push { items } => {
            let valid: Vec<_> = items
                .into_iter()
                .filter(|i| i.validate(2).is_ok())
                .collect();
            valid.iter().for_each(|item| store.push(item.clone()));
            diverse.push_batch(valid);
            let _ = diverse.sample(4, &mut rng);
            let _ = store.sample(4, &mut rng);
            let _ = store.stats(1.0, 1);
        }
        Request::Sample { n } => {
            let _ = store.sample(n.min(MAX_SAMPLE) as usize, &mut rng);
        }
        Request::Stats | Request::Shutdown | Request::Save { .. } | Request::Restore { .. } => {}
    }
}
