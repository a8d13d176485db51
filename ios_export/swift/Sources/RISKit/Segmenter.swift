import CoreGraphics
import CoreML
import Foundation

/// Runs a ptq4ris Core ML package: image + expression in, object mask out.
///
/// The package's inputs are `image` float32 [1, 3, S, S] (ImageNet-normalised RGB), `input_ids` and
/// `attention_mask` int32 [1, 20]; its output `logits` float32 [1, 2, S, S].
public final class Segmenter {
    public let model: MLModel
    public let tokenizer: WordPieceTokenizer
    public let size: Int
    private static let mean: [Float] = [0.485, 0.456, 0.406]
    private static let std: [Float] = [0.229, 0.224, 0.225]

    public struct Result {
        /// Row-major S×S mask, 1 where the expression's object is.
        public let mask: [UInt8]
        public let size: Int
        public let milliseconds: Double
    }

    /// - Parameters:
    ///   - modelURL: a compiled model (`.mlmodelc`, what Xcode makes of the `.mlpackage`) or an `.mlpackage`.
    ///   - vocabURL: the text encoder's `vocab.txt`.
    public init(modelURL: URL, vocabURL: URL, computeUnits: MLComputeUnits = .all) throws {
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        let compiled = modelURL.pathExtension == "mlpackage" ? try MLModel.compileModel(at: modelURL) : modelURL
        model = try MLModel(contentsOf: compiled, configuration: config)
        tokenizer = try WordPieceTokenizer(vocabURL: vocabURL)
        guard let shape = model.modelDescription.inputDescriptionsByName["image"]?.multiArrayConstraint?.shape,
              shape.count == 4 else {
            throw NSError(domain: "RISKit", code: 1, userInfo: [
                NSLocalizedDescriptionKey: "the model has no image input [1, 3, S, S]: export it with ptq4ris"])
        }
        size = shape[3].intValue
    }

    public func segment(_ image: CGImage, expression: String) throws -> Result {
        let (ids, mask) = try tokenizer.encode(expression)
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "image": MLFeatureValue(multiArray: try pixels(image)),
            "input_ids": MLFeatureValue(multiArray: try int32Array(ids)),
            "attention_mask": MLFeatureValue(multiArray: try int32Array(mask)),
        ])
        let start = DispatchTime.now()
        let output = try model.prediction(from: inputs)
        let ms = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e6
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw NSError(domain: "RISKit", code: 2, userInfo: [NSLocalizedDescriptionKey: "no logits output"])
        }
        let plane = size * size
        let values = logits.dataPointer.bindMemory(to: Float.self, capacity: 2 * plane)  // declared float32
        var result = [UInt8](repeating: 0, count: plane)
        for i in 0..<plane where values[plane + i] > values[i] { result[i] = 1 }
        return Result(mask: result, size: size, milliseconds: ms)
    }

    /// The image resized to S×S (as the host resizes: no aspect-preserving crop), CHW, ImageNet-normalised.
    func pixels(_ image: CGImage) throws -> MLMultiArray {
        var rgba = [UInt8](repeating: 0, count: size * size * 4)
        let drawn = rgba.withUnsafeMutableBytes { buffer -> Bool in
            // The context draws into `buffer`, which is only valid inside this closure.
            guard let context = CGContext(
                data: buffer.baseAddress, width: size, height: size, bitsPerComponent: 8, bytesPerRow: size * 4,
                space: CGColorSpaceCreateDeviceRGB(), bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)
            else { return false }
            context.interpolationQuality = .high
            context.draw(image, in: CGRect(x: 0, y: 0, width: size, height: size))
            return true
        }
        guard drawn else {
            throw NSError(domain: "RISKit", code: 3, userInfo: [NSLocalizedDescriptionKey: "cannot read the image's pixels"])
        }
        let array = try MLMultiArray(shape: [1, 3, NSNumber(value: size), NSNumber(value: size)], dataType: .float32)
        let out = array.dataPointer.bindMemory(to: Float.self, capacity: 3 * size * size)
        for c in 0..<3 {
            for i in 0..<(size * size) {
                out[c * size * size + i] = (Float(rgba[i * 4 + c]) / 255 - Self.mean[c]) / Self.std[c]
            }
        }
        return array
    }

    private func int32Array(_ values: [Int32]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: [1, NSNumber(value: values.count)], dataType: .int32)
        for (i, v) in values.enumerated() { array[i] = NSNumber(value: v) }
        return array
    }

    /// The mask as a translucent overlay image (S×S, to be drawn scaled over the photo).
    public static func overlay(_ result: Result, red: UInt8 = 255, alpha: UInt8 = 140) -> CGImage? {
        var rgba = [UInt8](repeating: 0, count: result.size * result.size * 4)
        for i in 0..<result.mask.count where result.mask[i] == 1 {
            rgba[i * 4] = red; rgba[i * 4 + 3] = alpha
        }
        let provider = CGDataProvider(data: Data(rgba) as CFData)
        return provider.flatMap {
            CGImage(width: result.size, height: result.size, bitsPerComponent: 8, bitsPerPixel: 32,
                    bytesPerRow: result.size * 4, space: CGColorSpaceCreateDeviceRGB(),
                    bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.last.rawValue),
                    provider: $0, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
        }
    }
}
