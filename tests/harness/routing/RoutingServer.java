// Embedded Tomcat with servlet mappings, as a Java (Spring Boot, plain servlet) upstream routes.
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.File;
import java.io.IOException;
import org.apache.catalina.Context;
import org.apache.catalina.startup.Tomcat;

public class RoutingServer {
    static HttpServlet area(String name) {
        return new HttpServlet() {
            @Override
            protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
                resp.setContentType("text/plain");
                if (name.equals("none")) {
                    resp.setStatus(404);
                    resp.getWriter().println("route=none saw=" + req.getServletPath());
                } else {
                    resp.getWriter().println("route=" + name);
                }
            }
        };
    }

    public static void main(String[] args) throws Exception {
        Tomcat tomcat = new Tomcat();
        tomcat.setBaseDir(new File(System.getProperty("java.io.tmpdir"), "tsnsrv-tomcat-" + args[0]).getPath());
        tomcat.setHostname("127.0.0.1");
        tomcat.getConnector().setProperty("address", "127.0.0.1");
        tomcat.getConnector().setPort(Integer.parseInt(args[0]));
        Context context = tomcat.addContext("", null);
        for (String name : new String[] {"admin", "secret", "ops", "public", "none"}) {
            Tomcat.addServlet(context, name, area(name));
        }
        for (String name : new String[] {"admin", "secret", "ops", "public"}) {
            context.addServletMappingDecoded("/api/" + name, name);
            context.addServletMappingDecoded("/api/" + name + "/*", name);
        }
        context.addServletMappingDecoded("/", "none");
        tomcat.start();
        System.out.println("listening");
        tomcat.getServer().await();
    }
}
