import Foundation
import XCTest
@testable import RISKit

/// The Swift tokenizer against the golden file written with the transformers tokenizer (tests/golden/wordpiece.json):
/// every sentence must give the same ids and mask. Needs the vocab: set RISKIT_VOCAB to the text encoder's vocab.txt.
final class WordPieceGoldenTests: XCTestCase {
    struct Golden: Decodable {
        struct Case: Decodable { let sentence: String; let input_ids: [Int32]; let attention_mask: [Int32] }
        let max_tokens: Int
        let cases: [Case]
    }

    func testMatchesTransformersOnEveryGoldenSentence() throws {
        guard let vocabPath = ProcessInfo.processInfo.environment["RISKIT_VOCAB"] else {
            throw XCTSkip("set RISKIT_VOCAB to vocab.txt (python -c 'from quantize.models.registry import text_encoder_dir; print(text_encoder_dir())')")
        }
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent()  // Tests/RISKitTests
            .deletingLastPathComponent().deletingLastPathComponent()  // swift
            .deletingLastPathComponent().deletingLastPathComponent()  // ios_export → repository root
        let data = try Data(contentsOf: repo.appendingPathComponent("tests/golden/wordpiece.json"))
        let golden = try JSONDecoder().decode(Golden.self, from: data)
        let tokenizer = try WordPieceTokenizer(vocabURL: URL(fileURLWithPath: vocabPath), maxTokens: golden.max_tokens)
        var failures = 0
        for c in golden.cases {
            let (ids, mask) = try tokenizer.encode(c.sentence)
            if ids != c.input_ids || mask != c.attention_mask {
                failures += 1
                XCTFail("\(c.sentence.debugDescription): got \(ids), want \(c.input_ids)")
            }
        }
        XCTAssertEqual(failures, 0)
    }

    func testEmptyExpressionIsRefused() throws {
        let tokenizer = try WordPieceTokenizer(vocab: ["[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102])
        XCTAssertThrowsError(try tokenizer.encode("   "))
    }
}
