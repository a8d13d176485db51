import ImageIO
import PhotosUI
import RISKit
import SwiftUI

/// Pick a photo, type an expression, see the mask. Bundle the exported `model.mlpackage` and the text encoder's
/// `vocab.txt` with the app target.
public struct SegmentView: View {
    @State private var item: PhotosPickerItem?
    @State private var photo: CGImage?
    @State private var overlay: CGImage?
    @State private var expression = ""
    @State private var status = "Pick a photo and describe an object."
    private let segmenter: Segmenter?

    public init(modelName: String = "model", bundle: Bundle = .main) {
        if let model = bundle.url(forResource: modelName, withExtension: "mlmodelc"),
           let vocab = bundle.url(forResource: "vocab", withExtension: "txt") {
            segmenter = try? Segmenter(modelURL: model, vocabURL: vocab)
        } else {
            segmenter = nil
        }
    }

    public var body: some View {
        VStack(spacing: 12) {
            ZStack {
                if let photo { Image(decorative: photo, scale: 1).resizable().scaledToFit() }
                if let overlay { Image(decorative: overlay, scale: 1).resizable().scaledToFit() }
            }
            .frame(maxHeight: 400)
            PhotosPicker("Choose photo", selection: $item, matching: .images)
            TextField("e.g. the dog on the left", text: $expression).textFieldStyle(.roundedBorder)
            Button("Segment", action: run).disabled(photo == nil || segmenter == nil)
            Text(segmenter == nil ? "model.mlpackage or vocab.txt missing from the app bundle" : status)
                .font(.footnote)
        }
        .padding()
        .onChange(of: item) { _, newItem in
            Task {
                if let data = try? await newItem?.loadTransferable(type: Data.self),
                   let source = CGImageSourceCreateWithData(data as CFData, nil) {
                    photo = CGImageSourceCreateImageAtIndex(source, 0, nil)
                    overlay = nil
                }
            }
        }
    }

    private func run() {
        guard let segmenter, let photo else { return }
        do {
            let result = try segmenter.segment(photo, expression: expression)
            overlay = Segmenter.overlay(result)
            status = String(format: "%.1f ms on device", result.milliseconds)
        } catch {
            status = error.localizedDescription
        }
    }
}
