// A Java app with no mesh code, run as `java JavaClient.java`: GET /http-client answers
// what java.net.http.HttpClient got from http://backend:9080/, GET /url-connection what
// HttpURLConnection got. Java reaches `backend` only through its sidecar
// (-Dhttp.proxyHost/-Dhttp.proxyPort in JAVA_TOOL_OPTIONS).
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URL;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;

public class JavaClient {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(System.getenv("PORT"));
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 0);
        HttpClient client = HttpClient.newHttpClient();
        server.createContext("/", exchange -> {
            String body;
            int status = 200;
            try {
                if (exchange.getRequestURI().getPath().equals("/url-connection")) {
                    HttpURLConnection c = (HttpURLConnection) new URL("http://backend:9080/").openConnection();
                    body = c.getResponseCode() + " " + new String(c.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
                } else {
                    HttpResponse<String> r = client.send(HttpRequest.newBuilder(URI.create("http://backend:9080/")).build(),
                                                         HttpResponse.BodyHandlers.ofString());
                    body = r.statusCode() + " " + r.body();
                }
            } catch (Exception e) {
                status = 502;
                body = "request failed: " + e;
            }
            byte[] out = body.getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(status, out.length);
            try (OutputStream os = exchange.getResponseBody()) {
                os.write(out);
            }
        });
        server.start();
    }
}
