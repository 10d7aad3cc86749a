//! The real Qwen3 tokenizer, as shipped in assets/.

mod common;

use qwen_mk::tokenizer::Tokenizer;

#[test]
fn capital_of_france_encodes_like_transformers() {
    let tokenizer = Tokenizer::from_model_dir(&common::assets()).unwrap();
    assert_eq!(
        tokenizer.encode("The capital of France is").unwrap(),
        vec![785, 6722, 315, 9625, 374]
    );
}

#[test]
fn decoding_round_trips_and_streams_whole_characters() {
    let tokenizer = Tokenizer::from_model_dir(&common::assets()).unwrap();
    let text = "Grüße, 世界! The quick brown fox.";
    let ids = tokenizer.encode(text).unwrap();
    assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    let mut stream = tokenizer.stream();
    let mut streamed = String::new();
    for id in ids {
        streamed.push_str(&stream.push(id).unwrap());
    }
    assert_eq!(streamed, text);
}
